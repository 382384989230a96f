import sys
from pathlib import Path

# The references import each other as top-level modules (`import golden`).
sys.path.insert(0, str(Path(__file__).parent))
