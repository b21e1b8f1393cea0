"""Model side of inspectd: backbones, synthetic defects, training, evaluation, export, bundles and runtime backends.

Nothing here imports from the daemon (`inspectd`): a training workstation needs only this package.
"""
