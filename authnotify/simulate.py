"""``authnotify simulate``: plays Alipay against a running ingress (contract section 9). To be built."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the ingress base URL")


async def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("authnotify simulate is not built yet")
