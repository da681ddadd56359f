from famviz.cli import main

raise SystemExit(main())
