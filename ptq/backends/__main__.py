"""`python -m ptq.backends build NAME...` builds environments (as a cell would on first use);
`python -m ptq.backends lock NAME...` re-resolves their lock files from locks/NAME.in;
`python -m ptq.backends list` prints each environment, its key and whether it is built."""

from __future__ import annotations

import argparse
import json

from ptq.backends import envs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ptq.backends", description=__doc__)
    parser.add_argument("action", choices=("build", "lock", "list"))
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    names = args.names or sorted(path.stem for path in envs.LOCKS.glob("*.in"))
    for name in names:
        if args.action == "build":
            print(name, envs.ensure(name), json.dumps(envs.build_info(name)))
        elif args.action == "lock":
            print(name, envs.compile_lock(name))
        else:
            print(name, envs.env_key(name), json.dumps(envs.build_info(name)))


if __name__ == "__main__":
    main()
