import sys

from meo_ds.study import main

sys.exit(main())
