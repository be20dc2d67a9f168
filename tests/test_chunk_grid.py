"""kernels.common.chunk_grid: the (column blocks, row chunks) grid of the column-summing backward kernels
(gelu, swiglu). Every row and column is covered by exactly one program, no chunk is empty (an empty chunk
would leave its partial sums unwritten), and the program count follows the target."""
import itertools

import pytest


@pytest.mark.parametrize("BM,BN", [(16, 256), (32, 16), (64, 128)])
def test_every_row_and_column_in_one_program(BM, BN):
    from dit_fast.kernels.common import chunk_grid

    for M, N, programs in itertools.product((1, 15, 16, 17, 100, 1000, 4099), (1, 16, 300, 4608), (1, 4, 528)):
        n_col, n_chunks, rows = chunk_grid(M, N, BM, BN, programs)
        where = f"M={M} N={N} BM={BM} BN={BN} programs={programs}: {n_col} x {n_chunks} chunks of {rows}"
        assert (n_col - 1) * BN < N <= n_col * BN, where
        assert rows % BM == 0 and rows > 0, where
        assert (n_chunks - 1) * rows < M <= n_chunks * rows, where  # the last chunk holds at least one row
        # as many chunks as the target allows, and never more than the row blocks
        assert n_chunks <= max(1, min(-(-M // BM), -(-programs // n_col))), where
