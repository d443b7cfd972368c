"""One-shot all-reduce + residual add (+ RMSNorm) on peer memory, in one Triton launch, with no barrier.

The Lamport design (TensorRT-LLM's one-shot all-reduce): every rank owns a buffer that all ranks can write
(PyTorch symmetric memory: P2P mappings, no multicast), holding 3 rounds x tp slots, pre-filled with a sentinel
(-0.0). Data is never -0.0 (it is sent as +0.0), so an element is ready exactly when it is no longer the
sentinel: the data is its own flag. Call k, on every rank, one program per row of D elements:
  1. push: store the row of x into slot `rank` of round k % 3 of every peer's buffer;
  2. pull: read slot r of round k % 3 of its own buffer for r = 0 .. tp-1, re-reading while any element is the
     sentinel, and sum in fp32 in that order (its own row from registers): every rank adds the same numbers in
     the same order, so every rank gets the same bits;
  3. s = residual + sum (rounded to x's dtype first, as the unfused graph rounds the all-reduce's output),
     normed = rms_norm(s) in fp32;
  4. reset round (k + 2) % 3, which call k - 1 used, to the sentinel. Safe: this rank has read every element of
     it (so every peer's write into it has landed), and no peer writes into it again before call k + 2, which
     needs this rank's call-(k+1) data, pushed after this launch has ended. The third round is the one peers
     may already fill for call k + 1 while this rank is still in call k: reset during call k - 1;
  5. the last program to finish advances the round and records how much to reset next time.
The round lives on the device, not the host, so a CUDA graph replays correctly whatever ran between replays.
A rank that never arrives leaves its peers spinning; after SPIN re-reads a row gives up and comes out NaN.

Every rank must make the same calls in the same order (what a rank-agnostic graph does). `fused` returns the
outputs, or a one-line reason when the kernel cannot take the call (the caller runs the reference instead).
The same reason holds on every rank, so all ranks take the same path.
"""
import socket
import warnings

import torch
import torch.distributed as dist
import triton
import triton.language as tl

MAX_BYTES = 1 << 20   # per rank and call: above it one-shot moves tp times more data than a ring; NCCL takes it
MAX_ROW = 16384       # elements of one row (one program holds a row in registers)
SPIN = 1 << 24        # re-reads of a row before a missing peer turns it into NaN
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
SENTINEL = {torch.int16: -(1 << 15), torch.int32: -(1 << 31)}  # the bits of -0.0


# peers: the address of tp buffer addresses; local: this rank's buffer, own: the same as integers of the same
# width (the sentinel's bits SENT); ctrl: the control block; n: elements of x; one program per row of D.
@triton.jit
def _one_shot(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, peers, local, own, ctrl, n, eps,
              D: tl.constexpr, BLOCK: tl.constexpr, RANK: tl.constexpr, TP: tl.constexpr, ROUND: tl.constexpr,
              SENT: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, UPCAST: tl.constexpr,
              SPIN: tl.constexpr):
    row = tl.program_id(0)
    k = tl.load(ctrl, volatile=True)               # this call's round, 0..2
    stale = tl.load(ctrl + 2, volatile=True)       # elements the previous call used
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    dt = x_ptr.dtype.element_ty
    BITS = own.dtype.element_ty
    peers = peers.to(tl.pointer_type(tl.uint64))
    bits = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(BITS, bitcast=True)
    mine = tl.where(bits == SENT, tl.zeros_like(bits), bits).to(dt, bitcast=True)  # -0.0 -> +0.0: never the sentinel
    at = k * ROUND + row * D + cols
    for r in tl.static_range(TP):                  # 1. push
        if r != RANK:
            peer = tl.load(peers + r).to(tl.pointer_type(dt))
            tl.store(peer + at + RANK * n, mine, mask=mask)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    late = tl.full([], 0, tl.int32)
    for r in tl.static_range(TP):                  # 2. pull, in rank order
        if r == RANK:
            acc += mine.to(tl.float32)
        else:
            v = tl.load(local + at + r * n, mask=mask, other=0.0, volatile=True)
            waiting = tl.sum(((v.to(BITS, bitcast=True) == SENT) & mask).to(tl.int32), axis=0)
            tries = tl.full([], 0, tl.int32)
            while (waiting > 0) & (tries < SPIN):
                v = tl.load(local + at + r * n, mask=mask, other=0.0, volatile=True)
                waiting = tl.sum(((v.to(BITS, bitcast=True) == SENT) & mask).to(tl.int32), axis=0)
                tries += 1
            late += waiting
            acc += v.to(tl.float32)
    acc = tl.where(late > 0, float("nan"), acc)
    res = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0)
    s = (res.to(tl.float32) + acc.to(dt).to(tl.float32)).to(dt)  # 3. the all-reduce's output rounded, then added
    tl.store(sum_ptr + row * D + cols, s, mask=mask)
    if NORM:
        f = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.where(mask, f * f, 0.0), axis=0) / D + eps)
        y = f * rstd
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if UPCAST:
                y = y.to(dt).to(tl.float32) * w   # transformers rounds before the weight
            else:
                y = y * w
        tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    own = own + ((k + 2) % 3) * ROUND              # 4. reset the previous call's round
    for start in range(row * BLOCK, stale, tl.num_programs(0) * BLOCK):
        tl.store(own + start + cols, tl.full([BLOCK], SENT, BITS), mask=start + cols < stale)
    tl.debug_barrier()                             # 5. every thread of this program is done with k
    done = tl.atomic_add(ctrl + 1, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        tl.store(ctrl + 1, 0)
        tl.store(ctrl + 2, TP * n)
        tl.store(ctrl, (k + 1) % 3)
    if late > 0:
        tl.atomic_add(ctrl + 3, 1)                 # rows that gave up, for tests and benchmarks


class Workspace:
    """One process group's peer buffers for one dtype on this rank's GPU, and its control block
    [round, programs finished, elements to reset, rows that gave up]."""

    def __init__(self, group_name: str, dtype: torch.dtype, device: torch.device, max_bytes: int = MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem
        group = torch._C._distributed_c10d._resolve_process_group(group_name)
        self.tp, self.rank, self.dtype = group.size(), group.rank(), dtype
        self.round = self.tp * (max_bytes // dtype.itemsize)
        self.buffer = symm_mem.empty(3 * self.round, dtype=dtype, device=device)
        with warnings.catch_warnings():  # needed by older torch, deprecated (a no-op) in newer
            warnings.simplefilter("ignore")
            if not symm_mem.is_symm_mem_enabled_for_group(group_name):
                symm_mem.enable_symm_mem_for_group(group_name)
        self.handle = symm_mem.rendezvous(self.buffer, group_name)
        self.buffer.view(INT[dtype]).fill_(SENTINEL[INT[dtype]])
        self.ctrl = torch.zeros(4, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # no rank pushes before every buffer holds the sentinel

    def late_rows(self) -> int:
        return int(self.ctrl[3].item())


_spaces: dict[tuple, "Workspace | str"] = {}


def workspace(group_name: str, dtype: torch.dtype, device: torch.device) -> "Workspace | str":
    """The group's workspace, made at the first call (a collective: every rank makes its first call together),
    or why there is none. Remembered either way, so a reason stays the same for every later call."""
    key = (group_name, dtype, device.index)
    if key not in _spaces:
        reason = _no_kernel_reason(group_name, device)
        if reason is None:
            try:
                _spaces[key] = Workspace(group_name, dtype, device)
            except RuntimeError as e:
                _spaces[key] = f"no symmetric memory ({' '.join(str(e).split())[:160]})"
        else:
            _spaces[key] = reason
    return _spaces[key]


def _no_kernel_reason(group_name: str, device: torch.device) -> str | None:
    if torch.cuda.is_current_stream_capturing():
        return "the first call came inside a CUDA graph capture; peer buffers are set up outside one"
    group = torch._C._distributed_c10d._resolve_process_group(group_name)
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return f"the process group runs {backend}, not NCCL"
    here = (socket.gethostname(), torch.cuda.current_device() if device.index is None else device.index)
    everyone = [None] * group.size()
    dist.all_gather_object(everyone, here, group=group)
    hosts = {h for h, _ in everyone}
    if len(hosts) > 1:
        return f"ranks on {len(hosts)} hosts; peer memory spans one"
    visible = torch.cuda.device_count()
    blocked = [d for _, d in everyone
               if d != here[1] and d < visible and not torch.cuda.can_device_access_peer(here[1], d)]
    verdicts = [None] * group.size()
    dist.all_gather_object(verdicts, blocked, group=group)  # one rank's missing peer access stops every rank
    blocked = [(r, b) for r, b in enumerate(verdicts) if b]
    return f"no P2P access from rank {blocked[0][0]} to GPU {blocked[0][1][0]}" if blocked else None


def fused(x: torch.Tensor, residual: torch.Tensor, weight, eps, upcast, group_name: str):
    """(normed or None, residual + all_reduce(x)) by the one-shot kernel; upcast None: no norm.
    Or a one-line reason why the kernel does not take this call."""
    if x.dtype not in INT:
        return f"dtype {x.dtype} (the kernel takes bfloat16, float16, float32)"
    if residual.dtype != x.dtype or residual.shape != x.shape:
        return f"residual {residual.dtype} {list(residual.shape)} differs from the reduced {x.dtype} {list(x.shape)}"
    D = x.shape[-1]
    if D > MAX_ROW:
        return f"rows of {D} elements over {MAX_ROW}"
    if x.numel() * x.element_size() > MAX_BYTES:
        return f"message of {x.numel() * x.element_size()} bytes over the {MAX_BYTES}-byte peer buffer"
    space = workspace(group_name, x.dtype, x.device)
    if isinstance(space, str):
        return space
    return launch(x, residual, weight, eps, upcast, peers=space.handle.buffer_ptrs_dev, buffer=space.buffer,
                  ctrl=space.ctrl, rank=space.rank, tp=space.tp)


def launch(x: torch.Tensor, residual: torch.Tensor, weight, eps, upcast, *, peers: int, buffer: torch.Tensor,
           ctrl: torch.Tensor, rank: int, tp: int) -> tuple:
    """One call of the kernel on given buffers: peers, the address of tp buffer addresses (this rank's `buffer`
    among them, 3 rounds of tp x (its largest message) elements, filled with the sentinel at first); ctrl, int32[4]
    zeros at first. fused() passes the workspace's; a test may pass buffers of its own."""
    x, residual = x.contiguous(), residual.contiguous()
    s = torch.empty_like(x)
    norm = upcast is not None
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if norm and upcast and weight is not None else x.dtype
    normed = torch.empty(x.shape, dtype=out_dtype, device=x.device) if norm else s
    if eps is None:  # aten.rms_norm's default: the machine epsilon of the accumulation type
        eps = torch.finfo(torch.float32).eps
    D, bits = x.shape[-1], INT[x.dtype]
    BLOCK = triton.next_power_of_2(D)
    _one_shot[(x.numel() // D,)](
        x, residual, weight if weight is not None else x, normed, s, peers, buffer, buffer.view(bits), ctrl,
        x.numel(), float(eps if norm else 0.0), D=D, BLOCK=BLOCK, RANK=rank, TP=tp, ROUND=buffer.numel() // 3,
        SENT=SENTINEL[bits], NORM=norm, HAS_W=weight is not None, UPCAST=bool(upcast), SPIN=SPIN,
        num_warps=max(1, min(16, BLOCK // 256)))
    return (normed if norm else None), s
