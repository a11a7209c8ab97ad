"""Where a benchmark ran: the machine and the devices the backend sees.

Every results file says which machine it was measured on and whether an
accelerator was used (#12: "otherwise the results say that no GPU was
measured"); this is the one place that finds out.
"""

import os
import platform
import time

import keras


def machine():
    """e.g. "x86_64, 2 cores"."""
    return (f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores")


def accelerators():
    """Non-CPU devices the backend sees, e.g. ["gpu:0"]."""
    try:
        devices = keras.distribution.list_devices()
    except (NotImplementedError, AttributeError, ImportError):
        import torch  # the torch backend has no distribution API

        devices = [f"gpu:{i}" for i in range(torch.cuda.device_count())]
    return [d for d in devices if not d.lower().startswith("cpu")]


def devices_note():
    """"no GPU measured (CPU only)", or the accelerators used."""
    devices = accelerators()
    return ("no GPU measured (CPU only)" if not devices
            else "on " + ", ".join(devices))


def stamp():
    """date, machine and devices, for a results file."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "devices": devices_note()}
