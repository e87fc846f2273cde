"""Device-to-device copy bandwidth (read + write bytes / s of a 4 GiB copy): the GPU runs'
roofline denominator (scripts/device-batch.sh, scripts/device-decode.sh). Prints one JSON line."""
import json, torch
x = torch.empty(1 << 31, dtype=torch.uint16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize()
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(10): y.copy_(x)
e1.record(); torch.cuda.synchronize()
s = e0.elapsed_time(e1) / 1e3 / 10
print(json.dumps({"bytes_moved_per_copy": 2 * x.numel() * 2, "seconds": s, "gb_per_s": 2 * x.numel() * 2 / s / 1e9}))
