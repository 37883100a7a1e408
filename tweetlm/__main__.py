from tweetlm.cli import main

raise SystemExit(main())
