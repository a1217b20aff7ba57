from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="relu-lstm", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))
