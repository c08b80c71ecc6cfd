"""The CPU device layer maps megatron-core's CUDA placements to CPU, and can be removed."""

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    # A fresh interpreter: the layer is process-wide.
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_cuda_placements_land_on_cpu_and_layer_is_removable():
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer
        activate_cpu_device_layer()
        a = torch.zeros(2, device="cuda")
        b = torch.ones(2, device=torch.cuda.current_device())
        c = torch.ones(2).cuda()
        torch.cuda.synchronize()
        print(a.device, b.device, c.device, a.type(), torch.ones(1, dtype=torch.bfloat16).type())
        deactivate_cpu_device_layer()
        try:
            torch.zeros(1, device="cuda")
            print("still mapped")
        except (RuntimeError, AssertionError):
            print("restored")
    """)
    assert out.splitlines() == ["cpu cpu cpu torch.cuda.FloatTensor torch.cuda.BFloat16Tensor", "restored"]


def test_megatron_rng_tracker_forks_cpu_generator():
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import activate_cpu_device_layer
        activate_cpu_device_layer()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 123)
        torch.manual_seed(7); before = torch.rand(1).item()
        torch.manual_seed(7)
        with tracker.fork():
            inside = torch.rand(1).item()
        after = torch.rand(1).item()
        print(before == after, inside != before)
    """)
    assert out == "True True"


def test_rewrites_suspended_only_inside_the_block_and_not_under_another_mode():
    """The model forward runs without the rewriting mode; it is back afterwards (also after an
    exception), and a mode stacked on top of ours (a test's HostSyncCounter) keeps it active."""
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import (
            HostSyncCounter, activate_cpu_device_layer, rewrites_suspended)
        activate_cpu_device_layer()

        def mapped():
            try:
                return torch.zeros(1, device="cuda").device.type
            except (RuntimeError, AssertionError):
                return "unmapped"

        with rewrites_suspended():
            inside = mapped()
            cpu_still = torch.ones(1, device=torch.cuda.current_device()).device.type
        try:
            with rewrites_suspended():
                raise ValueError
        except ValueError:
            pass
        after = mapped()
        with HostSyncCounter():
            with rewrites_suspended():
                stacked = mapped()
        print(inside, cpu_still, after, stacked)
    """)
    assert out == "unmapped cpu cpu cpu"


def test_cpu_weight_gradient_accumulation_equals_grad_then_add():
    """apex's fused weight-gradient kernel, for CPU: main_grad += g^T x, in FP32 from FP32 or
    bf16 inputs; it refuses tensors that are not on the CPU."""
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        from megatron_ct.parallel.device import _CpuWgradAccumulation as K
        torch.manual_seed(0)
        ok = []
        for dtype in (torch.float32, torch.bfloat16):
            x, g = torch.randn(3, 5, 16).to(dtype), torch.randn(3, 5, 24).to(dtype)  # [s, b, in], [s, b, out]
            main = torch.randn(24, 16)
            expected = main + g.reshape(-1, 24).float().t() @ x.reshape(-1, 16).float()
            (K.wgrad_gemm_accum_fp32 if dtype == torch.float32 else K.wgrad_gemm_accum_fp16)(x, g, main)
            ok.append(torch.allclose(main, expected, rtol=1e-6, atol=1e-5))
        try:
            K.wgrad_gemm_accum_fp32(x, g, main.to("meta"))
        except RuntimeError as e:
            ok.append("meta tensor" in str(e))
        print(ok)
    """)
    assert out == "[True, True, True]"


def test_training_models_accumulate_weight_gradients_in_the_ddp_buffers():
    """A CPU model built for DDP accumulates its linear layers' weight gradients into the DDP
    buffers by the GEMM, and an untied word embedding's by the lookup's backward
    (megatron_ct/model/embedding.py); over micro-batches the buffers hold what DDP's
    add-after-backward gives. A tied embedding (SmolLM2, Llama-3.2) keeps megatron-core's lookup:
    its DDP hook adds the sum of the embedding's and the output layer's gradients."""
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch, torch.distributed as dist
        from megatron.core import parallel_state as ps, tensor_parallel
        from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
        from megatron_ct.config import load_config, validate_for_world
        from megatron_ct.model.embedding import AccumulatingVocabParallelEmbedding
        from megatron_ct.model.llama import Numerics, build_model
        from megatron_ct.parallel.device import activate_cpu_device_layer, rewrites_suspended
        from megatron_ct.training.optimizer import wrap_ddp
        activate_cpu_device_layer()
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1)
        for untie in ("true", "false"):
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                     "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.vocab_size=200",
                                     "parallel.device=cpu", f"model.untie_embeddings_and_output_weights={untie}"])
            layout = validate_for_world(cfg, 1)
            chunks, _ = build_model(cfg.model, layout, Numerics(ddp=True))
            model = wrap_ddp(chunks, layout)[0]
            linears = [m for m in model.modules() if getattr(m, "gradient_accumulation_fusion", False)]
            embedding = model.module.embedding.word_embeddings
            ours = AccumulatingVocabParallelEmbedding if untie == "true" else VocabParallelEmbedding
            tokens = torch.randint(0, 200, (3, 2, 33))
            positions = torch.arange(32).expand(2, -1)

            def buffers(fused):
                for m in linears:
                    m.gradient_accumulation_fusion = fused  # read at every forward
                embedding.__class__ = ours if fused else VocabParallelEmbedding
                model.zero_grad_buffer()
                for mb in tokens:  # three micro-batches into the same buffers
                    with rewrites_suspended():
                        loss = model(mb[:, :-1], positions, attention_mask=None, labels=mb[:, 1:]).sum()
                    loss.backward()
                return {n: p.main_grad.clone() for n, p in model.named_parameters()}

            installed = type(embedding).__name__
            fused, unfused = buffers(True), buffers(False)
            close = all(torch.allclose(fused[n], unfused[n], rtol=1e-5, atol=1e-6) for n in fused)
            nonzero = all(fused[n].abs().sum() > 0 for n in fused)
            print(untie, installed, len(linears), close, nonzero)
            ps.destroy_model_parallel(); ps.initialize_model_parallel(1, 1)
    """)
    untied, tied = (line.split() for line in out.splitlines())
    assert untied[:2] == ["true", "AccumulatingVocabParallelEmbedding"]
    assert tied[:2] == ["false", "VocabParallelEmbedding"]
    for _, _, count, close, nonzero in (untied, tied):
        assert int(count) >= 9 and close == "True" and nonzero == "True"  # qkv, proj, fc1, fc2 per layer + output


def test_groups_with_the_same_ranks_are_one_gloo_group_on_cpu():
    """Each gloo group runs a thread waking every 10 ms; on CPU megatron-core's groups over the
    same ranks share one (a one-process run: every group is the same), its explicit gloo copies
    are left alone, and a re-initialisation after destroy_model_parallel still works."""
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import socket, torch, torch.distributed as dist
        from megatron_ct.parallel.device import activate_cpu_device_layer
        activate_cpu_device_layer()
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        from megatron.core import parallel_state as ps
        for gloo_copies in (False, True):
            ps.initialize_model_parallel(1, 1, create_gloo_process_groups=gloo_copies)
            groups = {id(g): g for g in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                      ps.get_data_parallel_group(), ps.get_context_parallel_group(), ps.get_model_parallel_group(),
                      ps.get_expert_model_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True))}
            copies = ps.get_data_parallel_group_gloo() if gloo_copies else None
            print(len(groups), copies is not None and id(copies) not in groups)
            t = torch.ones(1); dist.all_reduce(t, group=ps.get_tensor_model_parallel_group()); print(t.item())
            ps.destroy_model_parallel()
        dist.destroy_process_group()
    """)
    assert out.splitlines() == ["1 False", "1.0", "1 True", "1.0"]


def test_freed_host_memory_is_reused_without_page_faults():
    """After keep_freed_host_memory(), the blocks a "micro-batch" frees (48, 12 and 20 MiB,
    filled then freed, as activations are) come back from the heap once it has settled: the
    next rounds take (almost) no page faults, where glibc's defaults take one per 4 KiB page
    every round. A user's own allocator settings are left alone."""
    code = """
        import resource, sys, torch
        from megatron_ct.parallel.device import keep_freed_host_memory
        if sys.argv[1] == "keep":
            print(keep_freed_host_memory(), file=sys.stderr)
        def round_faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks = [torch.empty(n).fill_(1.0) for n in (12 << 20, 3 << 20, 5 << 20)]
            del blocks
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        # The median of the last 8 of 16 rounds: the heap takes a few rounds to settle, one
        # more on a loaded machine (a CI run averaged 5120 faults into its last 4 rounds).
        print(sorted([round_faults() for _ in range(16)][-8:])[4])
    """
    counts = {}
    for mode in ("default", "keep"):
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), mode], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[mode] = int(proc.stdout.strip())
    pages = (80 << 20) // 4096
    assert counts["default"] > pages // 2, counts  # fresh pages every round
    assert counts["keep"] < pages // 50, counts  # reused

    from megatron_ct.parallel.device import keep_freed_host_memory

    assert "kept" in keep_freed_host_memory({"MALLOC_ARENA_MAX": "2"})
    assert "kept" in keep_freed_host_memory({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
