"""Copy the first image of a shard to a file, as the /classify example of `make demo`."""

import sys
import tarfile


def main(shard: str, out: str) -> None:
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = tar.extractfile(member)
        assert data is not None
        with open(out, "wb") as f:
            f.write(data.read())
    print(f"example image for /classify: {out} (sample {member.name})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
