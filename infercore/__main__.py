from infercore.server.cli import main

raise SystemExit(main())
