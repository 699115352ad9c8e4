from cmoe_vlm.flops.cli import main

raise SystemExit(main())
