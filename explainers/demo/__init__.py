"""The embedded demo: a synthetic world with ground truth and a small LLaVA trained on it."""
from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent
DEMO_MODEL_DIR: Path = DEMO_DIR / "weights" / "final"
"""The trained demo checkpoint, in Hugging Face format; what ``--model demo`` loads."""
DEMO_EARLY_MODEL_DIR: Path = DEMO_DIR / "weights" / "early"
"""An early checkpoint of the same run, for comparing checkpoints side by side."""
