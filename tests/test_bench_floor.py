"""bench/floor.py: the verdict on a target and the sweep of read configurations (the CUDA part runs on the device)."""

from __future__ import annotations

from conftest import load_bench_script


def test_verdict_against_the_floor():
    floor = load_bench_script("floor")
    # cuBLAS 36 us, target 6x -> 6.0 us needed; a floor of 7.5 us makes it unreachable for any kernel
    assert floor.ceiling_verdict(36.0, 7.5, 6.0) == "needs 6.0 us: below the floor"
    # a floor of 3 us leaves room: half of the 6 us the target allows is the floor itself
    assert floor.ceiling_verdict(36.0, 3.0, 6.0) == "needs 6.0 us: 50% of it is the floor"
    assert floor.ceiling_verdict(36.0, 3.0, None) == "-"


def test_floor_configs_fit_an_sm_and_cover_one_pass():
    floor = load_bench_script("floor")
    sms, n16 = 132, 1 << 20
    cfgs = floor.floor_configs(n16, sms)
    assert len(cfgs) == len(set(cfgs))
    for blocks, threads, unroll in cfgs:
        assert threads in (256, 512, 1024) and unroll in (2, 4, 8)
        persistent = blocks % sms == 0 and blocks // sms in (1, 2, 4, 8)
        one_pass = blocks == -(-n16 // (threads * unroll))
        assert persistent or one_pass
        if persistent and not one_pass:
            assert blocks // sms * threads <= 2048  # resident at once
    # every (threads, unroll) pair has its one-pass grid, which covers every word exactly once per thread-load
    for threads in (256, 512, 1024):
        for unroll in (2, 4, 8):
            assert (-(-n16 // (threads * unroll)), threads, unroll) in cfgs


def test_targets_follow_the_issues_and_render():
    """4096x4096 is not a large shape: only W4 has a target there (2.5x); elsewhere each format's own; a
    rendered row carries the verdict of its target."""
    floor = load_bench_script("floor")
    assert floor.target_for("w4g128", 4096, 4096) == (2.5, 4)
    assert floor.target_for("w3g128", 4096, 4096) == (None, 4)
    assert floor.target_for("w3g128", 11008, 4096) == (4.0, 4)
    assert floor.target_for("s3sp", 8192, 8192) == (3.5, 5)
    assert floor.target_for("p161", 28672, 8192) == (6.0, 6)
    assert floor.target_for("p161s40", 28672, 8192) == (None, 6)
    head = dict(gpu="G", kernel="cublas_fp16", format="fp16", n=11008, k=4096, us=36.0, bytes=90e6, floor_us=30.0,
                date="d", torch="t", cuda="c", command="python bench/floor.py", configs=36, empty_kernel_us=0.8)
    row = dict(format="p161", n=11008, k=4096, bytes=9.2e6, floor_us=4.6, floor_pdl_us=3.0, us=11.5, cublas_us=36.0)
    text = floor.render([head, row])
    assert "| 11008x4096 | p161 | 9.20 | 4.6 | 3.0 | 11.5 | 40% | 3.13 | 7.83 | 6x (issue 6) | needs 6.0 us: 77% of it is the floor |" in text
    assert "| 11008x4096 | fp16 | 90.00 | 30.0 | - | 36.0 | 83% | 1.00 |" in text
