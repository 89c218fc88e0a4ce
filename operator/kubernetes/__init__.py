"""The kubernetes driver and the in-cluster operator: TightwadCluster resources in, pods out.

| module | job |
|---|---|
| `api.py` | the small REST client: apply, get, list, delete, watch |
| `cr.py` | a TightwadCluster object as a manifest, and its status |
| `lease.py` | leader election on a coordination.k8s.io Lease: one replica acts |
| `render.py` | units as pods, services, the manifest ConfigMap (pure) |
| `watch.py` | list-then-watch of TightwadCluster objects, kept as a local cache |
| `workloads.py` | the driver: observe pods, carry out the plan's actions (model check pods too) |
| `events.py` | Events on a TightwadCluster for `kubectl describe` (refusals, crash loops, swaps) |
| `controller.py` | `tightwad operator`: watch, plan, act, write status, per cluster |

A regular package, unlike operator/ itself: `kubernetes` is not a standard-library name, so nothing
is shadowed when this folder's parent is on sys.path.
"""
