"""`python -m archer_mcore.cli VERB ...`: the `archer` command without its console script
(slurm/archer_job.sh runs the trainer this way on the nodes)."""

import sys

from archer_mcore.cli.main import main

sys.exit(main())
