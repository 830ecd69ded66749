import sys

from fcsp_hook.observer.daemon import main

sys.exit(main())
