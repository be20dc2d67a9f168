"""The published model sizes of each family (no imports: scripts read this file on its own)."""

# name -> (depth, hidden_size, patch_size, num_heads); SiT publishes the same 12 sizes as "SiT-XL/2" etc.
CONFIGS: dict[str, tuple[int, int, int, int]] = {}
for _size, (_depth, _hidden, _heads) in {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}.items():
    for _p in (2, 4, 8):
        CONFIGS[f"DiT-{_size}/{_p}"] = (_depth, _hidden, _p, _heads)


# LightningDiT's published sizes: name -> (depth, hidden_size, patch_size, num_heads)
LIGHTNING_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    f"LightningDiT-{size}/{p}": (depth, hidden, p, heads)
    for size, (depth, hidden, heads), patches in (
        ("B", (12, 768, 12), (1, 2)), ("L", (24, 1024, 16), (2,)), ("XL", (28, 1152, 16), (1, 2)),
        ("1p0B", (24, 1536, 24), (1, 2)), ("1p6B", (28, 1792, 28), (1, 2)),
    )
    for p in patches
}
