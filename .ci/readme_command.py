"""Print one of the two set-up commands at the top of README.rst.

``python .ci/readme_command.py install`` prints the first (install + demo), ``test`` the second
(the test command).  CI runs the test command exactly as the README writes it.
"""

import pathlib
import sys


def commands(readme: pathlib.Path):
    lines = readme.read_text().splitlines()
    start = lines.index(".. code-block:: bash")
    block = []
    for line in lines[start + 1:]:
        if line.strip() == "":
            if block:
                break
            continue
        if not line.startswith("   "):
            break
        block.append(line.strip())
    if len(block) != 2:
        raise SystemExit(f"README.rst: expected exactly two set-up commands, found {block}")
    return {"install": block[0], "test": block[1]}


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parent.parent
    print(commands(root / "README.rst")[sys.argv[1]])
