"""`python -m ka_hf.experiment` runs the study's main job, `ka_hf.study.experiment` (see its docstring).

Importing this module imports nothing: the study loads only when it is run as a script.
"""

if __name__ == "__main__":
    from ka_hf.study.experiment import main

    main()
