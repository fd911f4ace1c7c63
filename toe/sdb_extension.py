"""The StreamDiffusionBridge extension: parameters become OSC, status becomes parameters.

This is the thin TouchDesigner glue. It runs inside the component, where the builder put it as
the Text DAT `StreamDiffusionBridgeExt`, and TouchDesigner's import finds its sibling Text DATs
`sdb_osc`, `sdb_process`, `sdb_supervisor` and `sdb_frames`. The callbacks DATs the builder
wrote call the methods below: the Parameter Execute DAT on every change or pulse of a custom
parameter, the OSC callbacks on every message from the bridge, the Execute DAT once per frame
and the two Script TOPs when they cook. Capitalised methods are promoted, so `parent().Start()`
works from inside the component and `op('StreamDiffusionBridge').Start()` from anywhere.
"""

import os
import tempfile
import time
from pathlib import Path

import sdb_frames
import sdb_osc
import sdb_process
import sdb_supervisor
import shm_protocol

CONNECTION_PARS = ("Transport", "Streamname", "Streaming", "Oscport", "Feedbackport")
STATUS_VALUE_PARS = ("Fps", "Latency", "Drops", "Skips")
RESUBSCRIBE_EVERY = 10.0
"""Seconds between two `/sd/subscribe` to a bridge not started here (subscriptions expire)."""


class StreamDiffusionBridgeExt:
    """Runs one `sd-bridge run` child and keeps it in step with the component's parameters."""

    def __init__(self, ownerComp) -> None:
        self.ownerComp = ownerComp
        self._process = sdb_supervisor.BridgeProcess(self._log_path(), pid_path=self._pid_path())
        self._subscribed: tuple[int, float] | None = None  # feedback port, when renewed
        self._sender: sdb_frames.FrameSender | None = None
        self._receiver: sdb_frames.FrameReceiver | None = None
        self._synced = True
        self._was_running = False
        self.ApplyConnections()

    def OnValueChange(self, par) -> None:
        """A custom parameter changed: send it to the bridge, or re-wire the transports."""
        live = sdb_osc.LIVE_PARAMS_BY_PAR.get(par.name)
        if live is not None:
            try:
                self._send([sdb_osc.osc_message(live, par.eval())])
            except ValueError as error:
                self._report(str(error))
        elif par.name in sdb_osc.LORA_PARAMS_BY_PAR:
            try:
                self._send(sdb_osc.lora_messages(*self._lora_values()))
            except ValueError as error:
                self._report(str(error))
        elif par.name in sdb_osc.CONTROLNET_PARAMS_BY_PAR:
            try:
                self._send(sdb_osc.controlnet_messages(*self._controlnet_values()))
            except ValueError as error:
                self._report(str(error))
        elif par.name in CONNECTION_PARS:
            self.ApplyConnections()

    def OnPulse(self, par) -> None:
        """A pulse parameter was pressed: Start, Stop or Sendall."""
        actions = {"Start": self.Start, "Stop": self.Stop, "Sendall": self.SendAll}
        if par.name in actions:
            actions[par.name]()

    def Start(self) -> None:
        """Start `sd-bridge run` with the component's settings and stream URIs."""
        try:
            command = sdb_process.bridge_command(self._settings())
            self._process.log_path = self._log_path()
            self._process.pid_path = self._pid_path()
            self._process.start(command)
        except (ValueError, sdb_supervisor.BridgeError) as error:
            self._report(str(error))
            return
        self._synced = False
        self._set_status("Lasterror", "")
        self._set_status("Log", str(self._process.log_path))
        self._set_status("State", self._process.poll().text)

    def Stop(self) -> None:
        """Ask the bridge to finish; it is killed if it has not after a few seconds."""
        self._process.stop()
        self._set_status("State", self._process.poll().text)

    def SendAll(self) -> None:
        """Send every live value in one bundle; subscribe to status if the bridge is not ours."""
        values = {param.par: self.ownerComp.par[param.par].eval() for param in sdb_osc.LIVE_PARAMS}
        messages, refusals = sdb_osc.all_messages(values)
        try:
            messages += sdb_osc.lora_messages(*self._lora_values())
        except ValueError as error:
            refusals.append(str(error))
        try:
            messages += sdb_osc.controlnet_messages(*self._controlnet_values())
        except ValueError as error:
            refusals.append(str(error))
        if not self._process.poll().running:
            port = int(self.ownerComp.par.Feedbackport.eval())
            messages.append(("/sd/subscribe", [port]))
            self._subscribed = (port, time.monotonic())
        self._send(messages)
        for refusal in refusals:
            self._report(refusal)

    def ApplyConnections(self) -> None:
        """Point the Spout TOPs, Script TOPs and OSC DATs at the current names and ports."""
        par = self.ownerComp.par
        name = str(par.Streamname.eval())
        try:
            transport = sdb_process.resolve_transport(str(par.Transport.eval()))
            sdb_process.stream_uris(transport, name)
        except ValueError as error:
            self._report(str(error))
            return
        streaming = bool(par.Streaming.eval())
        comp = self.ownerComp
        comp.op("spout_out").par.sendername = f"{name}-in"
        comp.op("spout_out").par.active = streaming and transport == "spout"
        comp.op("spout_in").par.sendername = f"{name}-out"
        comp.op("output_switch").par.index = 0 if transport == "spout" else 1
        comp.op("oscout").par.port = int(par.Oscport.eval())
        comp.op("oscin").par.port = int(par.Feedbackport.eval())
        self._close_streams()

    def OnFrameStart(self) -> None:
        """Once per frame: follow the child process and move shared-memory frames."""
        state = self._process.poll()
        self._set_status("State", state.text)
        if self._was_running and not state.running:
            for name in STATUS_VALUE_PARS:
                self._set_status(name, 0)
        self._was_running = state.running
        self._renew_subscription()
        par = self.ownerComp.par
        transport = sdb_process.resolve_transport(str(par.Transport.eval()))
        if transport == "shm" and par.Streaming.eval():
            self.ownerComp.op("shm_send").cook(force=True)
            self.ownerComp.op("shm_receive").cook(force=True)

    def OnOscReceived(self, address: str, args) -> None:
        """A message from the bridge: status values, or an error sentence."""
        update = sdb_osc.status_update(address, args)
        if update is not None:
            self._set_status(*update)
            if not self._synced:
                # The first status shows that the bridge listens: settings that have no
                # command-line flag (the fades, pause) go over now.
                self._synced = True
                self.SendAll()
            return
        sentence = sdb_osc.error_sentence(address, args)
        if sentence is not None:
            self._report(sentence)

    def SendFrame(self, scriptOp) -> None:
        """The `shm_send` Script TOP cooked: publish its input for the bridge."""
        if not scriptOp.inputs:
            return
        image = scriptOp.inputs[0].numpyArray(delayed=True)
        if image is None:
            return
        try:
            if self._sender is None:
                self._sender = sdb_frames.FrameSender(f"{self.ownerComp.par.Streamname.eval()}-in")
            self._sender.send(image)
        except (ValueError, shm_protocol.ShmError) as error:
            self._report(str(error))

    def ReceiveFrame(self, scriptOp) -> None:
        """The `shm_receive` Script TOP cooked: show the newest frame the bridge wrote."""
        try:
            if self._receiver is None:
                name = f"{self.ownerComp.par.Streamname.eval()}-out"
                self._receiver = sdb_frames.FrameReceiver(name)
            image = self._receiver.receive()
        except (ValueError, shm_protocol.ShmError) as error:
            self._report(str(error))
            return
        if image is not None:
            scriptOp.copyNumpyArray(image)

    def Shutdown(self) -> None:
        """Stop the bridge and wait for it; unsubscribe; release the shared-memory streams."""
        self._process.stop_and_wait()
        if self._subscribed is not None:
            self._send([("/sd/unsubscribe", [self._subscribed[0]])])
            self._subscribed = None
        self._close_streams()

    def onDestroyTD(self) -> None:
        """TouchDesigner drops this extension (component deleted or extension re-initialised)."""
        self.Shutdown()

    def _settings(self) -> sdb_process.BridgeSettings:
        par = self.ownerComp.par
        transport = sdb_process.resolve_transport(str(par.Transport.eval()))
        input_uri, output_uri = sdb_process.stream_uris(transport, str(par.Streamname.eval()))
        files, scales = self._lora_values()
        return sdb_process.BridgeSettings(
            python=str(par.Python.eval()),
            input_uri=input_uri,
            output_uri=output_uri,
            model=str(par.Model.eval()),
            width=int(par.Resolutionw.eval()),
            height=int(par.Resolutionh.eval()),
            tiny_vae=bool(par.Tinyvae.eval()),
            accel=str(par.Accel.eval()),
            osc_port=int(par.Oscport.eval()),
            feedback_port=int(par.Feedbackport.eval()),
            prompt=str(par.Prompt.eval()),
            negative_prompt=str(par.Negativeprompt.eval()),
            t_index=sdb_osc.parse_t_index(str(par.Tindex.eval())),
            cfg=str(par.Cfg.eval()),
            guidance=float(par.Guidance.eval()),
            delta=float(par.Delta.eval()),
            seed=int(par.Seed.eval()),
            similarity_filter=bool(par.Filterenable.eval()),
            similarity_threshold=float(par.Filterthreshold.eval()),
            max_skip_frames=int(par.Filtermaxskip.eval()),
            loras=list(zip(sdb_osc.lora_files(files), scales, strict=False)),
            ip_adapter=str(par.Ipadapterfile.eval()).strip(),
            ip_adapter_image=str(par.Ipadapterimage.eval()).strip(),
            ip_adapter_scale=float(par.Ipadapterscale.eval()),
            precision=str(par.Precision.eval()),
            compile_scope=str(par.Compilescope.eval()),
            live_compile=bool(par.Livecompile.eval()),
            background_compile=bool(par.Backgroundcompile.eval()),
            feature_bank_size=int(par.Banksize.eval()),
            controlnets=self._controlnet_entries(),
        )

    def _lora_values(self) -> tuple[list[str], list[float]]:
        """The LoRA file and scale of each slot."""
        par = self.ownerComp.par
        files = [str(par[f"Lora{slot}file"].eval()) for slot in range(sdb_osc.LORA_SLOTS)]
        return files, [float(par[lora.par].eval()) for lora in sdb_osc.LORA_PARAMS]

    def _controlnet_values(self) -> tuple[list[str], dict[str, object]]:
        """The model of each ControlNet slot, and the live values of every slot by name."""
        par = self.ownerComp.par
        models = [
            str(par[f"Controlnet{slot}model"].eval()) for slot in range(sdb_osc.CONTROLNET_SLOTS)
        ]
        return models, {live.par: par[live.par].eval() for live in sdb_osc.CONTROLNET_PARAMS}

    def _controlnet_entries(self) -> list[str]:
        """The `controlnet` entries the bridge starts with, from the ControlNet page."""
        par = self.ownerComp.par
        models, values = self._controlnet_values()
        slots = range(sdb_osc.CONTROLNET_SLOTS)
        sources = [str(par[f"Controlnet{slot}source"].eval()) for slot in slots]
        scales = [values[f"Controlnet{slot}scale"] for slot in slots]
        return sdb_osc.controlnet_entries(models, sources, scales)

    def _log_path(self) -> Path:
        # One log per TouchDesigner process: another one never truncates a log in use.
        name = self.ownerComp.par.Streamname.eval()
        return Path(tempfile.gettempdir()) / f"sd-bridge-td{os.getpid()}-{name}.log"

    def _pid_path(self) -> Path:
        # Keyed by the OSC port, which a bridge left behind by a crash would still hold.
        port = int(self.ownerComp.par.Oscport.eval())
        return Path(tempfile.gettempdir()) / f"sd-bridge-osc{port}.pid"

    def _renew_subscription(self) -> None:
        """Subscribe again before the bridge forgets a subscription made by SendAll."""
        if self._subscribed is None or time.monotonic() - self._subscribed[1] < RESUBSCRIBE_EVERY:
            return
        port = self._subscribed[0]
        self._send([("/sd/subscribe", [port])])
        self._subscribed = (port, time.monotonic())

    def _send(self, messages: list[sdb_osc.Message]) -> None:
        if not messages:
            return
        flat: list[object] = []
        for address, args in messages:
            flat += [address, args]
        self.ownerComp.op("oscout").sendOSC(*flat, asBundle=len(messages) > 1)

    def _close_streams(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    def _report(self, sentence: str) -> None:
        self._set_status("Lasterror", sentence)

    def _set_status(self, name: str, value: object) -> None:
        par = self.ownerComp.par[name]
        if par.eval() != value:
            par.val = value
