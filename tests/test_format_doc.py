"""docs/FORMAT.md's bytes-per-token table is computed by the code, not typed in."""

import pathlib
import re

from fa4_tq.codec import row_bytes

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def test_bytes_per_token_table_matches_code():
    text = DOC.read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (.+?) \|$", text, flags=re.M)
    seen = 0
    for d, bf16, rest in rows:
        d = int(d)
        if int(bf16) != 2 * d:
            continue
        cells = [c.strip() for c in rest.split("|")]
        for bits, cell in zip((8, 4, 3, 2), cells):
            nbytes = row_bytes(d, bits) + 2
            assert cell == f"{nbytes} ({2 * d / nbytes:.2f}x)", (d, bits, cell)
        seen += 1
    assert seen == 4


def test_mla_bytes_per_token_line_matches_the_cache():
    """The MLA paragraph's bytes per token are what mla.MLACache allocates."""
    import mla

    text = DOC.read_text()
    line = text[text.index("Bytes per token (float16 scales): bf16 latent"):]
    line = line[: line.index("The RoPE part")]
    per_token = {bits: mla.MLACache(1, 1, 64, bits=bits).nbytes // 64 for bits in (None, 8, 4, 3, 2)}
    assert f"bf16 latent {per_token[None]}" in line
    for bits in (8, 4, 3, 2):
        n = per_token[bits]
        assert f"{bits}-bit {n - 128} + 128 = {n} ({per_token[None] / n:.2f}x" in " ".join(line.split()), (bits, n)
