"""Run documentation code blocks one after another in this one interpreter, each in a namespace of its own (so a
block must import what it uses, as a reader's script would) and in a folder of its own; write every block's
traceback, or None, to a JSON file. One interpreter for all blocks: starting Python with torch and Lightning costs
seconds, which every block would pay again.

Usage: ``python doc_blocks.py BLOCKS.json RESULTS.json WORK_DIR``, where BLOCKS.json maps a block id to its code.
"""

import json
import os
import sys
import traceback
from pathlib import Path


def run(block_id: str, code: str, folder: Path) -> str | None:
    folder.mkdir(parents=True)
    os.chdir(folder)
    try:
        exec(compile(code, block_id, "exec"), {"__name__": "__main__"})
    except SystemExit as stop:  # a block may end with sys.exit(0); anything else is a failure
        return None if stop.code in (None, 0) else traceback.format_exc()
    except BaseException:
        return traceback.format_exc()
    finally:
        if "matplotlib.pyplot" in sys.modules:  # figures a block left open would pile up across blocks
            sys.modules["matplotlib.pyplot"].close("all")
    return None


def main(blocks_path: str, results_path: str, work_dir: str) -> None:
    blocks = json.loads(Path(blocks_path).read_text(encoding="utf-8"))
    results_file, work = Path(results_path).resolve(), Path(work_dir).resolve()  # the blocks change folder
    results = {}
    for i, (block_id, code) in enumerate(blocks.items()):
        results[block_id] = run(block_id, code, work / f"block{i}")
        # written after every block, so that a block that hangs still leaves the results before it
        results_file.write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:4])
