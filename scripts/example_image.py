"""Copy the first "red circle" image of a shard to a file: the /classify example of `make demo`."""

import json
import sys
import tarfile


def main(shard: str, out: str, classname: str = "red circle") -> None:
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name, member in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            if meta.get("classname") == classname:
                image = tar.extractfile(members[name.removesuffix(".json") + ".jpg"])
                assert image is not None
                with open(out, "wb") as f:
                    f.write(image.read())
                print(f"example image for /classify: {out} (a {classname}, sample {meta['key']})")
                return
    raise SystemExit(f"no {classname!r} sample in {shard}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
