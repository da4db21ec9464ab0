from dumo.cli import main

raise SystemExit(main())
