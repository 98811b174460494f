"""Run the megaclip CLI with pool_index wrapped: every call appends the pooled tokens to a file.

    POOL_SPY_OUT=calls.jsonl python tests/workers/pool_spy.py train ...

Each line: {"pool_type", "pooled_tokens": [...], "positions": [...]} of one forward.
"""

from __future__ import annotations

import json
import os
import sys

import megaclip.model.clip as clip
import megaclip.model.text as text
from megaclip.cli.main import main

_original = text.pool_index


def _spy(tokens, pool_type="argmax", eos_id=None):
    index = _original(tokens, pool_type, eos_id)
    path = os.environ.get("POOL_SPY_OUT")
    if path:
        pooled = tokens.gather(1, index[:, None])[:, 0]
        record = {"pool_type": pool_type, "pooled_tokens": pooled.tolist()}
        record["positions"] = index.tolist()
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return index


text.pool_index = clip.pool_index = _spy

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
