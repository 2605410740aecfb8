"""Triton kernels of lightllm, installed as ``lightllm.kernels``.

They know nothing of models: each module takes tensors and launches kernels. Imports inside this
package are relative, because the folder is ``kernels/`` in the source tree and
``lightllm/kernels/`` once installed.
"""

if __name__ == "lightllm.kernels":
    from .blockwise import dequantize_blockwise, quantize_blockwise

    __all__ = ["quantize_blockwise", "dequantize_blockwise"]
else:
    # Found as a top-level `kernels` because the checkout's root is on sys.path (`python -m`,
    # `python -c`, pytest or a notebook started there): that name belongs to Hugging Face's kernel
    # loader, which transformers imports. A regular package on an earlier path entry shadows any
    # later one, and dropping this __init__.py (a namespace portion, which loses to a regular
    # package) is not an option: setuptools' editable install cannot map `lightllm.kernels` onto a
    # folder without __init__.py (seen with setuptools 65 and 84). So hand the name over: load the
    # `kernels` that the path holds outside this checkout and put it in sys.modules, which is what
    # the import statement returns. Without one, stay an empty module with no __version__, which
    # transformers judges "not a usable kernels package" (raising would break `import transformers`,
    # which imports this module when it finds no `kernels` metadata).
    def _hand_over_to_the_installed_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        elsewhere = [p for p in sys.path if isinstance(p, str) and os.path.realpath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
        if spec is None or spec.loader is None:
            return
        installed = importlib.util.module_from_spec(spec)
        stand_in = sys.modules[__name__]
        sys.modules[__name__] = installed
        try:
            spec.loader.exec_module(installed)
        except BaseException:
            sys.modules[__name__] = stand_in
            raise

    _hand_over_to_the_installed_kernels()
    del _hand_over_to_the_installed_kernels
