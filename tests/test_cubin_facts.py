"""The artefact readers behind the GPU compile gate, on hand-written inputs (no toolchain
needed): SASS loop finding and load widths, and the kernel list read from the source."""
from benchmarks import cubin_facts, gpu_compile

# The shape cuobjdump prints: a prologue load, a loop (label, body, backward branch) with two
# 128-bit loads, one 32-bit load, a 128-bit store and a shared atomic, then a tail outside
# the loop: a scalar load, a predicated 128-bit load and a predicated 16-bit load.
SASS = """
        /*0000*/                   LDG.E.64 R2, desc[UR16][R2.64] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR16][R8.64] ;
        /*0020*/                   LDG.E.128 R12, desc[UR16][R8.64+0x10] ;
        /*0030*/                   FFMA R20, R4, R4, R20 ;
        /*0040*/                   LDG.E R21, desc[UR16][R10.64] ;
        /*0050*/                   ISETP.GT.AND P0, PT, R6, 0x7f7fffff, PT ;
        /*0058*/                   STG.E.128 desc[UR16][R8.64], R4 ;
        /*005c*/                   ATOMS.POPC.INC.32 RZ, [R23+UR4] ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
        /*0070*/                   LDG.E R22, desc[UR16][R10.64] ;
        /*0074*/              @!P1 LDG.E.128 R4, desc[UR16][R8.64] ;
        /*0078*/               @P2 LDG.E.U16 R24, desc[UR16][R10.64] ;
        /*0080*/                   EXIT ;
"""


def test_load_bytes_reads_the_width_modifier():
    assert cubin_facts.load_bytes("LDG.E.128") == 16
    assert cubin_facts.load_bytes("LDG.E.128.CONSTANT") == 16
    assert cubin_facts.load_bytes("LDG.E.64") == 8
    assert cubin_facts.load_bytes("LDG.E.U16") == 2
    assert cubin_facts.load_bytes("LDG.E") == 4


def test_hot_loop_is_the_backward_branch_range_with_its_loads():
    loop = cubin_facts.hot_loop(SASS)
    assert loop.instructions == 8  # 0x10 .. 0x60, the prologue and tail excluded
    assert loop.loads == {"LDG.E.128": 2, "LDG.E": 1}
    assert loop.stores == {"STG.E.128": 1}
    assert loop.bytes_loaded == 36
    assert loop.instructions_per_element(4) == 8 / 9
    assert loop.opcodes["ATOMS"] == 1 and "VOTE" not in loop.opcodes
    assert not loop.all_loads_128_bit  # the 32-bit load in the loop
    assert loop.all_stores_128_bit


def test_hot_loop_finds_branches_to_plain_addresses():
    sass = SASS.replace("`(.L_x_1)", "0x10").replace(".L_x_1:\n", "")
    assert cubin_facts.hot_loop(sass).instructions == 8


def test_masked_loads_outside_loops_are_the_predicated_ones_after_the_loop():
    # The unpredicated prologue and tail loads, and every load in the loop, are left out.
    assert cubin_facts.masked_loads_outside_loops(SASS) == {"LDG.E.128": 1, "LDG.E.U16": 1}


def test_no_hot_loop_without_a_backward_branch():
    assert cubin_facts.hot_loop(SASS.replace("@P0 BRA `(.L_x_1)", "NOP")) is None


def test_ptx_header():
    assert cubin_facts.ptx_header("//\n.version 9.4\n.target sm_90a\n.address_size 64\n") == {
        "ptx_isa": "9.4", "ptx_target": "sm_90a"}


def test_launch_targets_are_the_kernels_no_other_kernel_calls():
    targets = gpu_compile.launch_targets()
    assert "_stats_kernel" in targets and "_update_kernel" in targets
    helpers = set(gpu_compile.jit_functions()) - set(targets)
    assert "_work_item" in helpers  # called from the statistics and update kernels
    # The chunked kernels: VEC elements per 128-bit load, no alignment switch.
    assert "VEC" in gpu_compile.constexpr_names("_stats_kernel")
    assert "ALIGNED" not in gpu_compile.constexpr_names("_stats_kernel")
