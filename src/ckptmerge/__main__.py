from ckptmerge.cli.main import main

raise SystemExit(main())
