from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="rnn-through-time", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))
