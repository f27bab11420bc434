"""Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), for Python 3.12 x86-64.

The GPU image has torch, transformers, accelerate, peft and torchvision, but not diffusers,
bitsandbytes or pydantic. bitsandbytes' wheel carries a library for every CUDA and ROCm
version (43 MB); only CUDA 13.0's (the image's torch) and the CPU one are kept, so that the
working tree plus wheels stays under the device tool's 64 MiB transfer limit.

usage: python bench/device_wheels.py [--dest .whl] [--cuda 130]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
PACKAGES = ["diffusers", "bitsandbytes", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]


def trim_bitsandbytes(wheel: Path, cuda: str) -> Path:
    """A copy of the wheel without the native libraries of other CUDA/ROCm versions (RECORD kept consistent)."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
    out = wheel.with_name(wheel.name.replace(".whl", ".trim"))
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name):
                continue
            data = src.read(item)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(
                    line for line in lines
                    if not (re.search(r"libbitsandbytes_\w+\.so,", line) and not keep.search(line.split(",")[0]))
                ).encode() + b"\n"
            dst.writestr(item, data)
    out.replace(wheel)
    return wheel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=Path(".whl"))
    ap.add_argument("--cuda", default="130", help="CUDA version of the GPU image's torch, as in cu130")
    args = ap.parse_args()
    args.dest.mkdir(exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in PACKAGES]  # the versions tested here
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(args.dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + pins, check=True)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel, args.cuda)
    for wheel in sorted(args.dest.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")


if __name__ == "__main__":
    main()
