"""`python -m ka_hf.study.recall`: the recall study (ka_hf.study.recall.experiment)."""

from .experiment import main

if __name__ == "__main__":
    main()
