"""Start the "Rust (saev)" kernel once through Jupyter and run one cell, so evcxr compiles saev
and its dependencies into the persistent build directory (used by `saev-kernel warm` when
evcxr_repl is not installed). Prints the cell's output; exits 1 on an error output or timeout.

    python3 kernel/warm.py [KERNEL_NAME] [TIMEOUT_S]
"""

import sys
import time

try:
    from jupyter_client.manager import start_new_kernel
except ImportError:
    sys.exit("warm needs jupyter_client: python3 -m pip install --user jupyter_client")

name = sys.argv[1] if len(sys.argv) > 1 else "rust-saev"
timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 1800.0
t0 = time.time()
# The kernel runs init.evcxr (the cold `:dep saev`) before it answers, hence the long wait.
try:
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=timeout_s)
except Exception as e:  # a missing kernelspec, a kernel that died compiling saev, a timeout
    sys.exit(
        f"the {name!r} kernel did not start ({type(e).__name__}: {e}).\n"
        "  fix: kernel/saev-kernel check; if saev fails to compile inside evcxr, "
        "kernel/saev-kernel repl shows evcxr's messages"
    )
ok = True
try:
    print(f"kernel ready in {time.time() - t0:.0f} s", file=sys.stderr)
    msg_id = kc.execute('println!("saev prelude ready: {}", std::any::type_name::<Backbone>());')
    while True:
        msg = kc.get_iopub_msg(timeout=timeout_s)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            sys.stderr.write(content["text"])
        elif kind == "error":
            sys.stderr.write(f"{content['ename']}: {content['evalue']}\n")
            ok = False
        elif kind == "status" and content["execution_state"] == "idle":
            break
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print(f"warm in {time.time() - t0:.0f} s", file=sys.stderr)
sys.exit(0 if ok else 1)
