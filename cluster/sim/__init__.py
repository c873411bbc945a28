"""The simulator: the live cluster's decision code on a simulated clock.

The same objects run here as in the live cluster: the placement policies of
``policies/`` (``decide(view, now)``) and the time-share turn machine
(``policies/turns.py``), driven by a discrete-event clock and a roofline
cost model instead of Ray workers and vLLM engines. It imports the policies
and nothing of the engine, control plane or front door (``pyproject.toml``'s
import rules), so it runs anywhere in seconds and cannot drift into a copy
of the live code.

- ``profiles``: device and model profiles (data files, or ``shoal profile``);
- ``costmodel``: how long prefill, decode and switches take on a device;
- ``workload``: arrivals, popularity, lengths, CSV traces;
- ``engine``, ``device``, ``cluster``, ``worker``: the simulated cluster;
- ``systems``: Shoal and the baselines it is compared with;
- ``run``, ``search``, ``scenarios``, ``report``: runs and what they add up to;
- ``fidelity``: the hook the live-vs-simulator fidelity run calls.
"""
