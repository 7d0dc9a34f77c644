# The C core is built by cffi; setuptools needs this hook to run it (pyproject has no key for it).
from setuptools import setup

setup(cffi_modules=["dataplane/_build.py:ffibuilder"])
