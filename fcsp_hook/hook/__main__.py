import sys

from fcsp_hook.hook.oci_hook import main

sys.exit(main())
