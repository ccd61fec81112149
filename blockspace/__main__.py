from blockspace.cli.main import main

raise SystemExit(main())
