from serve_app.bench.cli import main

raise SystemExit(main())
