"""`python -m data.synthetic ...` (options: `data.synthetic.cli`)."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python synthetic` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.synthetic.cli import main  # noqa: E402

sys.exit(main())
