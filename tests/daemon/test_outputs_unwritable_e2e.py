"""An outputs folder the daemon cannot write into is answered as the user's condition (``WriteError``
naming the folder), not ``InternalError``, and the daemon keeps serving. (The full-disk case itself, with
ENOSPC and a picture written before it, is tested in ``tests/core/test_outputs_full_disk.py``.)"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from daemon_testing import make_daemon, run

from sdrepl.daemon.client import RemoteError

pytestmark = pytest.mark.e2e


def test_unwritable_outputs_folder_is_a_write_error(short_tmp: Path) -> None:
    d = make_daemon(short_tmp)
    d.outputs.mkdir(parents=True)
    blocked = d.outputs / datetime.date.today().isoformat()
    blocked.write_text("a file where the day's folder goes")
    d.start()
    try:
        async def scenario() -> None:
            async with d.client() as c:
                hashed = (await c.request("status"))["model_hash"]  # tiny's weights are small: known at once
                assert hashed["state"] == "known" and len(hashed["hash"]) == 10
                with pytest.raises(RemoteError) as info:
                    await c.request("generate", prompt="x", steps=1, width=64, height=64, seed=1)
                assert info.value.type_name == "WriteError", info.value.message
                assert str(blocked) in info.value.message and "Traceback" not in info.value.message
                blocked.unlink()
                result = await c.request("generate", prompt="x", steps=1, width=64, height=64, seed=1)
                assert Path(result["images"][0]["path"]).is_file()

        run(scenario())
    finally:
        d.stop()
    assert "Traceback" not in d.log()
