"""Triton kernels and their plain launchers. No autograd and no dispatch here: the op registry
(deeparch_kernels.ops) wraps these launchers as ``torch.library.triton_op`` ops."""
