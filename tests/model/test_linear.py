"""The lean TP-1 linear layers (megatron_ct/model/linear.py) compute megatron-core's values bit
for bit, and are installed only where they are exact."""

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    # A fresh interpreter: the CPU device layer and the process group are process-wide.
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_lean_linears_equal_megatron_core_bit_for_bit():
    """Per family (LLaMA; Qwen2 with its QKV bias; Qwen3 with q/k norms), tied and untied: three
    micro-batches into the DDP buffers, with a frozen layer in the middle (megatron-core's frozen
    path), give the same per-token losses and the same buffers as megatron-core's own linear
    layers; every GEMM layer of the model takes the lean path, and a sequence-parallel or TP-2
    layer would not (checked on the flags the installer reads)."""
    out = run("""
        import warnings; warnings.filterwarnings("ignore")
        import torch, torch.distributed as dist
        from megatron.core import parallel_state as ps, tensor_parallel
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron_ct.config import load_config, validate_for_world
        from megatron_ct.model.linear import LeanColumnParallelLinear, LeanRowParallelLinear, lean_linears
        from megatron_ct.model.llama import Numerics, build_model
        from megatron_ct.parallel.device import activate_cpu_device_layer, rewrites_suspended
        from megatron_ct.training.optimizer import wrap_ddp
        activate_cpu_device_layer()
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1)
        for family, untie in (("llama", "true"), ("qwen2", "false"), ("qwen3", "true")):
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                                     "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.vocab_size=200",
                                     "parallel.device=cpu", f"model.family={family}",
                                     f"model.untie_embeddings_and_output_weights={untie}"])
            layout = validate_for_world(cfg, 1)
            chunks, _ = build_model(cfg.model, layout, Numerics(ddp=True))
            model = wrap_ddp(chunks, layout)[0]
            lean = {m: type(m) for m in model.modules() if type(m) in (LeanColumnParallelLinear, LeanRowParallelLinear)}
            gemms = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
            model.module.decoder.layers[0].mlp.linear_fc2.weight.requires_grad_(False)  # frozen: megatron-core's path
            tokens = torch.randint(0, 200, (3, 2, 33))
            positions = torch.arange(32).expand(2, -1)

            def run(use_lean):
                for m, cls in lean.items():
                    m.__class__ = cls if use_lean else cls.__mro__[1]
                model.zero_grad_buffer()
                losses = []
                for mb in tokens:  # three micro-batches into the same buffers
                    with rewrites_suspended():
                        loss = model(mb[:, :-1], positions, attention_mask=None, labels=mb[:, 1:])
                    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
                    losses.append(loss.detach().clone())
                grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                return torch.stack(losses), grads

            (l1, g1), (l0, g0) = run(True), run(False)
            same = torch.equal(l1, l0) and all(torch.equal(g1[n], g0[n]) for n in g0)
            nonzero = all(g1[n].abs().sum() > 0 for n in g1)
            has_bias = any(m.bias is not None for m in lean)
            # what the installer refuses: a layer that needs TP communication (all are
            # megatron-core's classes again after run(False))
            probe = gemms[0]
            probe.sequence_parallel = True
            refused = lean_linears(model) == len(gemms) - 1 and type(probe) is lean[probe].__mro__[1]
            probe.sequence_parallel = False
            print(family, len(lean), len(gemms), same, nonzero, has_bias, refused)
            ps.destroy_model_parallel(); ps.initialize_model_parallel(1, 1)
    """)
    rows = [line.split() for line in out.splitlines()]
    assert [r[0] for r in rows] == ["llama", "qwen2", "qwen3"]
    for family, n_lean, n_gemms, same, nonzero, has_bias, refused in rows:
        assert int(n_lean) == int(n_gemms) >= 8, (family, n_lean, n_gemms)  # every GEMM layer
        assert same == "True" and nonzero == "True" and refused == "True", family
        assert has_bias == ("True" if family == "qwen2" else "False"), family
