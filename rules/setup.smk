# Included before `configfile:` (Snakefile): the package on the import path, and the config
# file's YAML checked, so a syntax error names the file, line and column; Snakemake's own
# message names only the Snakefile line of `configfile:`. (A --configfile is read by Snakemake
# before any of the workflow runs.)

import os
import sys
from pathlib import Path

# Jobs import the package from the checkout, with or without `pip install` (conda envs and
# cluster jobs too: envvars passes PYTHONPATH on to remote executors).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [SRC, os.environ.get("PYTHONPATH")])
)
# Jobs' OpenMP threads spin briefly, then sleep, while they wait (loramill.openmp): fast on a
# quiet machine, and beside other busy processes no slower than their share of the cores.
# libgomp reads this when torch loads, in each job process, which inherits it from here. A
# user's OMP_WAIT_POLICY or GOMP_SPINCOUNT stands.
from loramill import openmp

os.environ.update(openmp.job_environment(os.environ))


envvars:
    "PYTHONPATH",
    *[name for name in openmp.VARIABLES if name in os.environ],


from loramill import LoramillError
from loramill.config import check_yaml_syntax

if os.path.exists(CONFIG_FILE):  # a missing file is Snakemake's to report
    try:
        check_yaml_syntax(CONFIG_FILE)
    except LoramillError as error:
        sys.exit(f"loramill: {error}")
