import sys
from pathlib import Path

import pytest

# The references import each other as top-level modules (`import golden`).
sys.path.insert(0, str(Path(__file__).parent))
# golden.assert_file_matches asserts for the tests: explain its failures too.
pytest.register_assert_rewrite("golden")
