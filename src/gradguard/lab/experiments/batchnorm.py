from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="batchnorm", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))
