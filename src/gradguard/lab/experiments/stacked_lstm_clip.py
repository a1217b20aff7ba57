from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="stacked-lstm-clip", seeds=(), title="todo", summary="todo",
                      run=lambda ctx: Result({}, {}, []))
