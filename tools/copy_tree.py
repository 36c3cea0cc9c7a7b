"""Copy the working tree as a fresh clone would hold it, with the uncommitted changes: the files git tracks or would
add (not ignored), links kept as links, so a build starts without the ``build/`` or ``*.egg-info`` an earlier build
left behind (setuptools packs stale files from them).

    python tools/copy_tree.py DEST     # from anywhere inside the checkout; DEST must not exist or be empty
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path


def copy_tree(root: Path, dst: Path) -> int:
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    copied = 0
    for name in filter(None, names):
        src, target = root / name, dst / name
        if not (src.exists() or src.is_symlink()):  # deleted in the working tree, not yet in the index
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
        copied += 1
    return copied


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    print(f"{copy_tree(Path(top.stdout.strip()), Path(sys.argv[1]))} files copied to {sys.argv[1]}")
