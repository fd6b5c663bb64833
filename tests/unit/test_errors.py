"""The one errno -> SodaError map."""

import errno

import pytest

from soda import errors


@pytest.mark.parametrize("code, cls", [
    (errno.ENOENT, errors.NotFound), (errno.ENODEV, errors.NotFound),
    (errno.EINVAL, errors.InvalidSpec), (errno.ERANGE, errors.InvalidSpec),
    (errno.EEXIST, errors.AlreadyExists),
    (errno.EPERM, errors.WrongState), (errno.EACCES, errors.WrongState), (errno.EBUSY, errors.WrongState),
    (errno.EROFS, errors.WrongState), (errno.ENOSPC, errors.WrongState), (errno.EOPNOTSUPP, errors.WrongState),
    (errno.EAGAIN, errors.TemporaryError), (errno.ENOMEM, errors.TemporaryError),
    (errno.ENOBUFS, errors.TemporaryError), (errno.EINTR, errors.TemporaryError),
    (errno.EIO, errors.SodaError), (None, errors.SodaError),
])
def test_a_kernel_refusal_maps_by_errno(code, cls):
    exc = errors.from_errno(code, "cannot do it")
    assert type(exc) is cls
    assert exc.message == "cannot do it"
