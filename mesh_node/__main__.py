from mesh_node.cli.main import main

raise SystemExit(main())
