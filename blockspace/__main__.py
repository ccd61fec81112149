from blockspace.cli import main

raise SystemExit(main())
